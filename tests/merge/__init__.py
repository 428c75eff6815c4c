"""Fixtures for the merged-image tests: real layers (mkfs.erofs images and tar indexes) and an unpacking oracle."""
