"""Kubernetes support: the ConfigMap settings generator and the Job launcher (`tokenmill k8s ...`).

Nothing here imports the `kubernetes` client at module level: `tokenmill --help` stays fast.
"""
