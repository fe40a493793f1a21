"""Rate limits and bounds, so a hostile or runaway user costs itself, not the node.

    keys       per-key state that forgets idle keys, at most max_keys of them
    buckets    token buckets per key (rate and burst), clock-injected
    policy     every limit of a node from [limits], one Limits for the whole daemon
    overrides  the limits an operator raised for single users (cimctl limits)
    messages   the first check of every msg:R, which also keeps a sender's order

Failed logins are counted in sliding windows instead (cim.throttle), on the same keys.
"""
