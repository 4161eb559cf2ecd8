"""One error hierarchy for the whole project.

Libraries raise these; only the CLI turns them into a one-line message and an exit code
(DESIGN.md: 0 ok, 1 the job ran and failed, 2 bad input or usage). Messages say what is
wrong and how to fix it, and never carry PHI, tensors or key material.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class FedsiloError(Exception):
    """Root of every error fedsilo raises on purpose.

    Args:
        message: what is wrong, in one line.
        fix: how to fix it, in one line (optional; appended after "fix:").
    """

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.message if not self.fix else f"{self.message} (fix: {self.fix})"
        return " ".join(text.split())


class ConfigError(FedsiloError):
    """A plan, policy, site folder or command-line value is invalid."""

    exit_code = EXIT_BAD_INPUT


class DataError(FedsiloError):
    """Local data cannot be read or does not match what the plan needs."""

    exit_code = EXIT_BAD_INPUT


class PrivacyBudgetError(FedsiloError):
    """A round would spend more privacy than a dataset or plan allows."""

    exit_code = EXIT_FAILED


class RefusalError(FedsiloError):
    """A silo or the coordinator refused a request (unapproved plan, policy, egress)."""

    exit_code = EXIT_FAILED


class VerificationError(FedsiloError):
    """An integrity check failed: the audit log, a signature or an update is not intact."""

    exit_code = EXIT_FAILED


class DeploymentError(FedsiloError):
    """A process of the federation could not start or stopped unexpectedly."""

    exit_code = EXIT_BAD_INPUT
