"""meshnode.cli"""
