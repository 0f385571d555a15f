"""tensor <-> compact bytes. The only place in lowbit where bits are packed."""
from lowbit.codecs.base import Codec, Packed
from lowbit.codecs.delta import DeltaCodec
from lowbit.codecs.error_bounded import ErrorBoundedCodec
from lowbit.codecs.frequency import FrequencySplitCodec
from lowbit.codecs.headwise import HeadwiseCodec
from lowbit.codecs.lossless import IndexCodec, MaskCodec, RawCodec
from lowbit.codecs.uniform import SUPPORTED_BITS, UniformCodec

__all__ = ["Codec", "Packed", "UniformCodec", "MaskCodec", "IndexCodec", "RawCodec", "DeltaCodec", "FrequencySplitCodec", "ErrorBoundedCodec", "HeadwiseCodec", "SUPPORTED_BITS"]
