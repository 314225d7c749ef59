"""kif's reliability campaign (`kif bench reliability`): kills, full disks and races during
kif's writes (`crash`, `writers`), tampered files (`tamper`), hostile inputs fed to every reader
(`fuzz`), counted by `bench`."""
