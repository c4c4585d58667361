class UserFacingError(RuntimeError):
    """An error caused by the user's input (files, options, missing steps).

    Its message names the file, case or option at fault and says what to do. The CLI prints
    it without a traceback; inside ``nnUNetv2_train`` it surfaces as an ordinary exception
    raised before any training step runs.
    """
