"""Problems the user can fix. The CLI prints them as one red line and exits with code 1."""


class FacetagError(Exception):
    """Base class: the message is shown to the user as it is, so it says what to do."""


class ConfigError(FacetagError):
    """A config file or flag is wrong (unknown key, wrong type, bad value)."""


class DataError(FacetagError):
    """A dataset, image or box file cannot be used."""


class ModelError(FacetagError):
    """A model path does not exist or is not a facetag model."""


class DeviceError(FacetagError):
    """The device asked for is not available."""


class TrainingError(FacetagError):
    """Training stopped (for example the loss became NaN)."""
