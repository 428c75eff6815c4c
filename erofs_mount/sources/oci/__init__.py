"""OCI registry sources: pure parts (reference, manifest, auth, options) and async parts
(client, credentials, blob).  Import the submodules directly; this package imports nothing."""
