"""kif's error types. Each carries a one-line message meant for the user; the CLI prints it as
`kif: error: <message>` and exits with status 2."""


class KifError(Exception):
    """Base class of every error kif reports to a user."""


class UnknownNameError(KifError, KeyError):
    """A name (split, person, zoo model, method) that kif does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
