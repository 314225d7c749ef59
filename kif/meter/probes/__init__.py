"""The meter's probes, one module each; `kif.meter.registry.PROBES` names them. Every probe is a
function `fn(audit: kif.meter.audit.Audit) -> kif.meter.report.ProbeResult`."""
