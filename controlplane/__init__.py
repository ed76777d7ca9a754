"""meshnode.controlplane"""
