"""The Python API of a trained classifier run (the class lives in `modeling.classifier`):

    from mhsupport import classifier
    clf = classifier.load("artifacts/train_classifier/<run_id>")
    clf.predict_proba([[{"speaker": "seeker", "text": "I lost my job"}]])  # (n, 4), rows sum to 1
"""

from mhsupport.modeling.classifier import Classifier, load

__all__ = ["Classifier", "load"]
