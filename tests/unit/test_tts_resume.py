import numpy as np

from workers.tts.espeak import PhonemeMark, SynthChunk, WordMark
from workers.tts.stage import _drop_samples


def chunks(sizes):
    out, pos = [], 0
    for n in sizes:
        out.append(SynthChunk(pcm=np.arange(pos, pos + n, dtype=np.int16), sample=pos,
                              phonemes=[PhonemeMark("a", pos + 1)],
                              words=[WordMark(0, 1, pos + 2)]))
        pos += n
    return out


def test_takeover_skips_exactly_the_published_samples():
    out = _drop_samples(chunks([100, 100, 100]), 150)
    pcm = np.concatenate([c.pcm for c in out])
    assert pcm[0] == 150 and len(pcm) == 150
    assert out[0].sample == 150
    # marks before the cut were published by the dead worker already
    assert [p.sample for c in out for p in c.phonemes] == [201]
    assert _drop_samples(chunks([100]), 100) == []
    assert len(_drop_samples(chunks([100, 50]), 0)) == 2
