"""The contract between the netfence controller and its agents (NodeRuleSet)."""

from netfence_api.models import (  # noqa: F401
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    AllowRule,
    Condition,
    Isolation,
    NodeRuleSet,
    NodeRuleSetSpec,
    NodeRuleSetStatus,
    ObjectMeta,
    PeerGroup,
    PeerPort,
    PeerPortGroup,
    PolicedPod,
    PortRange,
    TierRule,
    spec_hash,
    short_hash,
)
