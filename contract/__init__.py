"""The contract between the stages: what a trial reports, what an experiment holds, what a technique is.

Small, dependency-free, and below every stage (`data_prep`, `trainable`, `sweep` and `analysis` import it; it imports
none of them, nor torch, nor Ray), so each concept is defined once:

* `contract.techniques`: the switch vocabulary, the named technique presets, the derived label and family;
* `contract.keys`: every key a trial reports, with its meaning;
* `contract.experiment`: an experiment's file names, the Tune config keys the sweep adds, trial names;
* `contract.io`: atomic writes of local files and storage URIs, and one-line error messages;
* `contract.cli`: command-line flags generated from a config dataclass.
"""
from .experiment import GRID_FILE, GRID_KEY, KIND_KEY, MAX_BATCH_FILE, PREDICTIONS_FILE, TRIAL_KINDS, trial_name
from .keys import REPORT_KEYS, STATUSES, keys_of
from .techniques import TECHNIQUES, Switches, technique_family, technique_label

__all__ = [
    "GRID_FILE", "GRID_KEY", "KIND_KEY", "MAX_BATCH_FILE", "PREDICTIONS_FILE", "REPORT_KEYS", "STATUSES",
    "Switches", "TECHNIQUES", "TRIAL_KINDS", "keys_of", "technique_family", "technique_label", "trial_name",
]
