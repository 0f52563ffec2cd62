"""Question engines: each proposes :class:`~qlx.data.engines.base.Candidate` questions with verifiable answers."""
