"""Starting a planned run for `cruijff run`: on the served experiment deployment when one is
served (`cruijff serve`, a pool's worker), else in this process."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from cruijff.deployments.client import served_experiment_deployment, trigger, wait_for
from cruijff.flows.console import quiet_console, server_lost, without_cruijff_errors
from cruijff.flows.server import ServerInfo, ensure_api

from cruijff.errors import CruijffError
from cruijff.pipeline import RunPlan
from cruijff.settings import CruijffSettings


def connect() -> ServerInfo:
    """The Prefect server runs report to (cruijff's own, started if needed)."""
    quiet_console()
    return ensure_api(CruijffSettings().home)


@dataclass
class Launch:
    """A run about to go: on a served deployment (`flow_run` set) or in this process."""

    plan: RunPlan
    server: ServerInfo
    flow_run: UUID | None

    def run(self) -> bool:
        """Run it here, or wait for the triggered flow run; True if every selected stage
        succeeded. A lost Prefect server is one CruijffError naming how to resume."""
        if self.flow_run is None:
            from cruijff.flows.experiment import run_experiment  # Dask: only when run here
        without_cruijff_errors()  # after the imports: they set up Prefect's logging
        try:
            if self.flow_run is not None:
                return wait_for(self.flow_run)
            return run_experiment(**self.plan.parameters())
        except Exception as exc:
            if not server_lost(exc):
                raise
            first = str(exc).splitlines()[0] if str(exc) else "no answer"
            raise CruijffError(
                f"lost the Prefect server at {self.server.url} during the run "
                f"({type(exc).__name__}: {first}); stages that finished are recorded on disk: "
                f"`cruijff server start`, then `cruijff run {self.plan.experiment.path}` "
                "resumes") from None


def launch(plan: RunPlan, server: ServerInfo, *, local: bool) -> Launch:
    """Trigger the served experiment deployment with the plan, unless `local` or none is
    served (then Launch.run runs the flow in this process)."""
    deployment = None if local else served_experiment_deployment()
    flow_run = None if deployment is None else trigger(deployment, plan.parameters(),
                                                       plan.experiment.name)
    return Launch(plan, server, flow_run)
