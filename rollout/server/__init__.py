"""The gRPC service: proto conversion (convert), servicer, token auth, server launch (app)."""
