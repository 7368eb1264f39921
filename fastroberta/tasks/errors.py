"""The one error of task data."""
from fastroberta.training.errors import ConfigError


class DataError(ConfigError):
    """Bad task data (missing field, unknown label, empty split, non-numeric regression label ...): one line that
    names the file, the row and the field."""
