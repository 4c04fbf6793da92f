from conftest import STEPS, b64_to_image


def test_sdk_text_to_image_returns_png_of_requested_size(sdk):
    response = sdk.image_gen.generate_flux_dev(prompt="a red fox", width=512, height=512, steps=STEPS, seed=7)
    assert len(response.images) == 1
    assert response.images[0].seed == 7
    image = b64_to_image(response.images[0].image_b64)
    assert (image.format, image.size) == ("PNG", (512, 512))
    assert response.prediction_time_ms > 0
