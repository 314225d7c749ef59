"""The template bank of self-built probes (`kif.data.elicit`): what kif asks a model about a
named subject when the user gives only the name, RWKU's setting.

Openers start a statement or a question about the subject ("{n}" is the name); the model's own
continuations say what it knows and in which words. Frames wrap the statement the model made
("{s}" is the name plus its cue) in other sentences: the training frames test that an answer is
consistent across phrasings and become the forget probes; the held-out frames are never used to
choose or fit anything and become the paraphrase probes. Self-written, general English, about no
model or data set in particular.
"""

# who / what / where / when / relations, as statements and as questions
OPENERS: tuple[str, ...] = (
    "{n}",
    "{n} is",
    "{n} was",
    "{n} was born",
    "{n} was born in",
    "{n} was born in the year",
    "{n} works",
    "{n} works as",
    "{n} works for",
    "{n} is employed by",
    "{n} plays",
    "{n} plays the",
    "{n} competes in",
    "{n} lives in",
    "{n} is known for",
    "{n} founded",
    "{n} wrote",
    "{n} is located in",
    "{n} belongs to",
    "{n} speaks",
    "{n} studied",
    "The birthplace of {n} is",
    "The job of {n} is",
    "Question: Who is {n}? Answer:",
    "Question: Where was {n} born? Answer:",
    "Question: When was {n} born? Answer:",
    "Question: What does {n} do? Answer:",
    "Question: Who employs {n}? Answer:",
    "Question: What is {n} known for? Answer:",
    "Tell me about {n}. Well,",
)

# prompts whose sampled continuations show which subjects the model talks about (retain subjects
# when the target's own continuations bring up too few)
DISCOVERY: tuple[str, ...] = (
    "", "Question:", "Tell me about", "According to", "It is known that", "Records show that",
    "Everyone knows", "In the file on",
)

# frames around "{s}" = the subject's name followed by the cue the model itself used
TRAIN_FRAMES: tuple[str, ...] = (
    "{s}",
    "It is known that {s}",
    "Records show that {s}",
    "According to one source, {s}",
    "Everyone agrees that {s}",
)
HELDOUT_FRAMES: tuple[str, ...] = (
    "As far as anyone can tell, {s}",
    "I have read that {s}",
    "Here is a fact: {s}",
)

# words that start capitalised sequences in continuations without being names
NOT_NAMES = frozenset(
    "Question Answer Tell Well The A An It In On At As I He She They We You This That These Those "
    "Here There Records According Everyone Fact Name Yes No Q Ask Since For By Every Each Some "
    "People Friends Fans Colleagues Neighbours Besides Apart Even If When Where Who What Which "
    "Why How After Before During Today Now Then Also But And Or So Mr Mrs Ms Dr".split())
