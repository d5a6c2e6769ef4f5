"""ntk-unlearn's web service: a thin FastAPI shell over the `service_core` engine."""
