"""Prefect deployments of cruijff's flows, installed as `cruijff.deployments`: serving and
registering them, triggering one and waiting for it, and launching a planned run there or in
this process."""
