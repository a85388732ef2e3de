"""What people ask of gpufleet (`acct`, `jobs show`, placement, `drain`, `resume`), as ONE
API with two implementations: `LocalUserApi` over the store and Slurm (the head node, and the
controller's FleetUser servicer, which is built on it) and `RemoteUserApi`
(gpufleet.scheduler.service.user_remote: the same calls over gRPC, as the user, MUNGE).

Each command is written once against `UserApi` and answers the same either way. Domain code:
it never imports gRPC, protobuf or the CLI.
"""

from gpufleet.scheduler.userapi.model import (
    Caller,
    FailedPrecondition,
    InvalidRequest,
    JobCheckpoint,
    JobRecovery,
    JobReport,
    NodeActionResult,
    NotFound,
    PermissionDenied,
    PlaceAnswer,
    Unavailable,
    UserApi,
    UserApiError,
)

__all__ = [
    "Caller",
    "FailedPrecondition",
    "InvalidRequest",
    "JobCheckpoint",
    "JobRecovery",
    "JobReport",
    "NodeActionResult",
    "NotFound",
    "PermissionDenied",
    "PlaceAnswer",
    "Unavailable",
    "UserApi",
    "UserApiError",
]
