"""The Serve application: ``import_path: serve.app:build_app`` in a Serve config file.

``args`` are ``ServeConfig`` fields, plus optionally ``config``, a YAML file they override. The model
served at start is ``model``; a new version is swapped in, without restarting anything, by changing
the ``user_config`` of Ingress (``{"model": path}``), Retriever and Ranker (``{"models": [paths]}``):
see ``serve.runner.swap_model``.
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
    internal = {"logging_config": {"enable_access_log": config.internal_access_log}}
    options = {name: {**deployment.serve_options(), **(internal if name != "Ingress" else {})} for name, deployment in config.deployments.items()}
    models = {"models": [config.model]}

    store = UserStateStore.options(**options["UserStateStore"]).bind(config)
    retriever = Retriever.options(**options["Retriever"], user_config=models).bind(config, store)
    ranker = Ranker.options(**options["Ranker"], user_config=models).bind(config)
    reranker = ReRanker.options(**options["ReRanker"]).bind(config)
    feedback_logger = FeedbackLogger.options(
        **options["FeedbackLogger"], graceful_shutdown_timeout_s=FEEDBACK_SHUTDOWN_TIMEOUT_S
    ).bind(config)
    return Ingress.options(**options["Ingress"], user_config={"model": config.model}).bind(
        config, store, retriever, ranker, reranker, feedback_logger
    )
