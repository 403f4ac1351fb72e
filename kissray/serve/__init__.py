"""Online scoring with Ray Serve (SPEC section 8).

- :mod:`kissray.serve.app`: the Ingress and Classifier deployments, ``build_app``, ``run_server``
- :mod:`kissray.serve.api`: routes, parameters, response body, errors, the bearer-key middleware
- :mod:`kissray.serve.uploads`: multipart uploads streamed to disk under a limit, JSON bodies
- :mod:`kissray.serve.uris`: which URIs a client may name (``UriPolicy``)
- :mod:`kissray.serve.limits`: the API key, decode slots and the replica's real CPU allotment
- :mod:`kissray.serve.films`: one film staged, opened and decoded on a thread that always cleans up

``kissray.serve:app_builder`` is the import path of Serve config files.
"""

from kissray.serve.app import APP_NAME, Classifier, Ingress, app_builder, build_app, run_server
from kissray.serve.config import ServeConfig
from kissray.serve.uris import UriPolicy, canonical_uri

__all__ = ["APP_NAME", "Classifier", "Ingress", "ServeConfig", "UriPolicy", "app_builder", "build_app",
           "canonical_uri", "run_server"]
