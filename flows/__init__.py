"""The Prefect and Dask side of a run, installed as `cruijff.flows`: flows and tasks, the Dask
clusters, the managed Prefect server. Only `cruijff.cli` and `cruijff.deployments` import it;
what runs, and in which order, is decided in the core (cruijff.pipeline)."""
