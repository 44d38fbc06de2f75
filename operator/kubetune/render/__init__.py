"""Pure functions from a validated FineTuneJob to the manifests that run it."""

from kubetune.render.pytorchjob import (
    RenderConfig,
    build_all,
    build_pod_template,
    build_pytorchjob,
    build_spec_configmap,
)

__all__ = ["RenderConfig", "build_all", "build_pod_template", "build_pytorchjob", "build_spec_configmap"]
