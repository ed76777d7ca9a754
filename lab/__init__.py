"""The netns lab: a mesh on one machine (meshnode lab; bench and tests use it)."""
