"""What every task needs to find its inputs: the store, the config and the plan of stage keys."""

from __future__ import annotations

from pydantic import BaseModel

from nlrewrite_core.config import RewriteConfig
from nlrewrite_core.storage import Store


class RunContext(BaseModel):
    """Passed to every task: small, picklable, and enough to locate every artifact."""

    run_id: str
    storage: str
    """Storage root: a local directory or s3://bucket/prefix."""
    endpoint_url: str | None = None
    """S3 endpoint for non-AWS S3 (credentials come from the AWS environment, never from here)."""
    config: RewriteConfig
    stage_keys: dict[str, str]
    """Content key of every stage (nlrewrite_core.stages.plan)."""

    def store(self) -> Store:
        return Store(self.storage, endpoint_url=self.endpoint_url)
