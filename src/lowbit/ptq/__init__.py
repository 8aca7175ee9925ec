"""Post-training quantization: calibration, the passes (CLE, bias correction, AdaRound, GPTQ) and their driver.

``lowbit.ptq.passes`` is the driver (``quantize``: prepare_ → passes / calibrate / convert_ in the order of
``lowbit.transforms.pass_registry``); each pass module has ``apply(model, forward_loop)``;
``lowbit.ptq.capture`` is the one helper they share to stream what a layer sees.
"""
