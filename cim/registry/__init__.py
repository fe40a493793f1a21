"""Which IM nodes are alive, behind INodeRegistry; the embedded backend knows this node only."""
