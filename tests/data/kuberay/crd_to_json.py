"""Store a KubeRay CRD as compact JSON (the same content as the release's YAML, a third of its size).

    git show v1.7.0:ray-operator/config/crd/bases/ray.io_rayjobs.yaml | python crd_to_json.py > ray.io_rayjobs.json
"""

import json
import sys

import yaml

if __name__ == "__main__":
    (crd,) = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]
    json.dump(crd, sys.stdout, separators=(",", ":"), sort_keys=True)
    sys.stdout.write("\n")
