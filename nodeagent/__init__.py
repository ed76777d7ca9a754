"""meshnode.nodeagent"""
