"""Models and what is done with them: loading every profile (and the offline weights' cache), the
device rule, prompt formatting, edits before training, teacher-forced scoring, batched decoding,
a generator's likelihoods under its tags, and the classifier's inference wrapper."""
