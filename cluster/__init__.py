"""Running the trainer on a Ray cluster.

- `cluster.local`: start/stop a local multi-node Ray cluster (one head with the dashboard plus N worker
  nodes, all on this machine) for `ray job submit` and tests: `python -m cluster.local start --workers 2`.
- `cluster/gpu-cluster.yaml`: a Ray cluster-launcher config (AWS: CPU head, GPU workers, EFS at /mnt/shared).
- `cluster/rayjob.yaml`: a KubeRay `RayJob` running `trainer/launch.py` with a ReadWriteMany volume.

See cluster/README.md.
"""
