"""The Serve application, either graph of it: ``import_path: serve.app:build_app`` in a Serve config file.

``args`` are ``ServeConfig`` fields, plus optionally ``config``, a YAML file they override. ``graph`` picks
the layout, whose deployments ``serve.config.GRAPH_DEPLOYMENTS`` names and ``build_graph`` binds:

- ``split``: the Ingress calls the UserStateStore, then a deployment per stage (Retriever, Ranker,
  ReRanker), then hands impressions to the FeedbackLogger; each stage is scaled and placed on its own.
- ``colocated``: the Ingress, deployed as the Recommender and given no stage deployments, runs the
  stages in its own replica (``serve.recommendation.ColocatedStages``) and calls only the
  UserStateStore and the FeedbackLogger.

The model served at start is ``model``; a new version is swapped in, without restarting anything, by
changing the ``user_config`` of the ingress (``{"model": path}``) and of the model deployments
(``{"models": [paths]}``, ``ServeConfig.user_configs``): see ``serve.runner.swap_model``.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve.config import ServeConfig
from serve.deployments import FeedbackLogger, Ingress, Ranker, ReRanker, Retriever, UserStateStore

#: Time for a FeedbackLogger to flush its WAL into Parquet when it is stopped.
FEEDBACK_SHUTDOWN_TIMEOUT_S = 120


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application of a Serve config file's ``args``."""
    args = dict(args or {})
    return build_graph(ServeConfig.from_yaml(args.pop("config", None), **args))


def build_graph(config: ServeConfig) -> Application:
    """``config.graph``'s deployments, each with its options and first ``user_config``, bound to the ingress."""
    options = _deployment_options(config)
    store = UserStateStore.options(**options["UserStateStore"]).bind(config)
    feedback_logger = FeedbackLogger.options(**options["FeedbackLogger"], graceful_shutdown_timeout_s=FEEDBACK_SHUTDOWN_TIMEOUT_S).bind(config)
    if config.graph == "split":
        stages = (
            Retriever.options(**options["Retriever"]).bind(config, store),
            Ranker.options(**options["Ranker"]).bind(config),
            ReRanker.options(**options["ReRanker"]).bind(config),
        )
    else:
        stages = ()
    ingress = config.ingress_deployment()
    return Ingress.options(name=ingress, **options[ingress]).bind(config, store, feedback_logger, *stages)


def _deployment_options(config: ServeConfig) -> dict[str, dict[str, Any]]:
    """``Deployment.options`` of every deployment: resources and admission, the internal ones' access log, and
    the ``user_config`` that serves ``config.model``."""
    ingress = config.ingress_deployment()
    internal = {"logging_config": {"enable_access_log": config.internal_access_log}}
    user_configs = config.user_configs(models=[config.model], active=config.model)
    return {
        name: {
            **deployment.serve_options(config.admission.retry_after_s),
            **(internal if name != ingress else {}),
            **({"user_config": user_configs[name]} if name in user_configs else {}),
        }
        for name, deployment in config.deployments.items()
    }
