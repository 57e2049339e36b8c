"""The ground floor: the error type every layer raises (``errors``) and atomic file writes
(``atomic``). Imports nothing else of fliqs."""
