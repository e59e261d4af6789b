"""Connecting to the Kubernetes API, the same way for the controller and the agent."""

import kubernetes


def load_client(kubeconfig: str | None) -> kubernetes.client.ApiClient:
    """A client from the given kubeconfig, else in-cluster (a Pod), else ~/.kube/config."""
    config = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    else:
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=config)
    return kubernetes.client.ApiClient(config)
