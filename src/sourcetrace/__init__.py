"""sourcetrace: trace what a model produces back to the training data that caused it."""

from . import ensembles, evaluate
from .attributor import Attributor, available_methods
from .data import Examples, LMExamples, lm_examples
from .diffusion import DiffusionTask
from .scores import Attribution, Scores
from .tasks import CausalLMTask, ClassificationTask, RegressionTask, Task
from .trajectory import Trajectory, TrajectoryRecorder, trajectory_callback

__version__ = "0.1.0"

__all__ = ["Attribution", "Attributor", "CausalLMTask", "ClassificationTask", "DiffusionTask", "Examples",
           "LMExamples", "RegressionTask", "Scores", "Task", "Trajectory", "TrajectoryRecorder",
           "__version__", "available_methods", "ensembles", "evaluate", "lm_examples", "trajectory_callback"]
