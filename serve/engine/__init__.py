"""The signal engine: live bar feed, online features, signal computation, the Gold store of
served signals and the typed snapshot the API reads."""
