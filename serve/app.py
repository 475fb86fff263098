"""The Serve application: ``import_path: serve.app:build_app`` in a Serve config file.

``args`` are ``ServeConfig`` fields, plus optionally ``config``, a YAML file they override; ``graph``
picks the layout (``split``: Ingress, Retriever, Ranker and ReRanker; ``colocated``: one Recommender,
which is the Ingress running the stages in its replica). The model served at start is ``model``; a
new version is swapped in, without restarting anything, by changing the ``user_config`` of the
ingress (``{"model": path}``) and of the model deployments (``{"models": [paths]}``): see
``serve.runner.swap_model``.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve.config import ServeConfig
from serve.deployments import FeedbackLogger, Ingress, Ranker, ReRanker, Retriever, UserStateStore

#: Time for a FeedbackLogger to flush its WAL into Parquet when it is stopped.
FEEDBACK_SHUTDOWN_TIMEOUT_S = 120


def build_app(args: dict[str, Any] | None = None) -> Application:
    args = dict(args or {})
    config = ServeConfig.from_yaml(args.pop("config", None), **args)
    ingress = config.ingress_deployment()
    internal = {"logging_config": {"enable_access_log": config.internal_access_log}}
    user_configs = config.user_configs(models=[config.model], active=config.model)
    options = {
        name: {**deployment.serve_options(config.admission.retry_after_s), **(internal if name != ingress else {}), **({"user_config": user_configs[name]} if name in user_configs else {})}
        for name, deployment in config.deployments.items()
    }

    store = UserStateStore.options(**options["UserStateStore"]).bind(config)
    feedback_logger = FeedbackLogger.options(
        **options["FeedbackLogger"], graceful_shutdown_timeout_s=FEEDBACK_SHUTDOWN_TIMEOUT_S
    ).bind(config)
    if config.graph == "split":
        stages = (
            Retriever.options(**options["Retriever"]).bind(config, store),
            Ranker.options(**options["Ranker"]).bind(config),
            ReRanker.options(**options["ReRanker"]).bind(config),
        )
    else:  # the ingress runs the stages itself
        stages = ()
    return Ingress.options(name=ingress, **options[ingress]).bind(config, store, feedback_logger, *stages)
