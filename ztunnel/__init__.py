"""meshnode.ztunnel"""
