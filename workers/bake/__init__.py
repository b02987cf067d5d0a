"""Bake: pre-rendered lines (barks, cutscene dialogue, voice-over) as WAV + Live Link Face CSV.

``lines``: the CSV of lines and what counts as already rendered; ``render``: one line through
the same TTS and lipsync chains as a live turn; ``queue``: rq on a plain Redis (jobs, abandoned
jobs of killed workers); ``worker``: the rq worker that yields to live conversations.
"""
