"""fedsilo: cross-silo federated learning for hospitals.

Packages: ``pipelines`` (MONAI side), ``silo_agent`` (hospital side), ``coordinator``
(federation side), ``compliance`` (audit trail). This package holds only what they share
(the error hierarchy) and the ``fedsilo`` command that wires their CLIs together.
"""

__version__ = "0.1.0"
