"""The pure compiler: Kubernetes objects in, one NodeRuleSetSpec per node out. No I/O."""

from netfence_operator.compile.compiler import Compiler, compile_cluster  # noqa: F401
from netfence_operator.compile.objects import (  # noqa: F401
    ClusterNetworkPolicy,
    ClusterObjects,
    InputError,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    flatten_documents,
    parse_documents,
    parse_object,
)
