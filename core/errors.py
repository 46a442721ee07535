"""The one base of every error a user can cause (a spec, a name, a file, a prompt): its message
says what was wrong and what is accepted. The CLI prints it and exits 2, the API answers it
with a 4xx; any other exception is primer's own fault and keeps its traceback."""


class UserError(ValueError):
    """Raised where a user's input is not usable; a ValueError, as pydantic's validators expect."""
