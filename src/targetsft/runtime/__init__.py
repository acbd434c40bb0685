"""The runtime layer every other one stands on: crash-safe files, precision by capability, model loading and the
command line's input errors. Imports nothing else of targetsft."""
