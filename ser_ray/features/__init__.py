"""Audio -> features: decode/resample, MFCC, eGeMAPS, speaker normalisation, unlabeled pools."""
