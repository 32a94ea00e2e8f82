"""The baselines on LLaVA-1.5 (`transformers.LlavaForConditionalGeneration`): `BaselineLlavaForConditionalGeneration`,
LLaVA's adapter for `etc_ext.baselines.model.BaselineMixin`. Every image has the same N tokens on one patch grid, so
the vision-side methods reduce while the images are encoded (hooks on the projector and the CLIP layer LLaVA reads:
`get_image_features` returns K tokens per image)."""

from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from ..compress import default_position_ids, find_image_spans
from ..models.llava import LlavaInputsMixin
from ..models.llava import num_visual_tokens as llava_num_visual_tokens
from .config import VisualGeometry
from .model import BaselineMixin, EncodedPrompt

__all__ = ["BaselineLlavaForConditionalGeneration"]


# ============================================================================ LLaVA
class BaselineLlavaForConditionalGeneration(LlavaInputsMixin, BaselineMixin, LlavaForConditionalGeneration):
    """A `LlavaForConditionalGeneration` with a training-free compressor; made by `apply_baseline`, never
    instantiated directly."""

    # ------------------------------------------------------------------------------------------ integration hooks
    @staticmethod
    def baseline_geometry(model: LlavaForConditionalGeneration) -> VisualGeometry:
        config = model.config
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        return VisualGeometry(
            num_visual_tokens=llava_num_visual_tokens(config),
            grid=(side, side),
            cls_feature=config.vision_feature_select_strategy == "full",
            num_hidden_layers=config.text_config.num_hidden_layers,
        )

    def _baseline_projector(self) -> nn.Module:
        """The module that maps vision features to the language model's width (the vision-side methods hook it)."""
        return self.model.multi_modal_projector

    def _baseline_vision_layer(self) -> nn.Module:
        """The vision encoder layer whose output LLaVA reads (`vision_feature_layer`)."""
        feature_layer = self.config.vision_feature_layer
        if not isinstance(feature_layer, int) or isinstance(feature_layer, bool):
            raise ValueError(
                f"visionzip reads one vision layer; this model concatenates layers {feature_layer} "
                "(vision_feature_layer is a list)"
            )
        tower = self.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        index = feature_layer % (len(layers) + 1)  # into hidden_states: 0 = embeddings, i = output of layer i - 1
        if index == 0:
            raise ValueError("visionzip needs an attention layer: vision_feature_layer selects the embeddings")
        return layers[index - 1]

    # ------------------------------------------------------------------------------------------ vision-stage hooks
    def _baseline_reduce_projected(self, _module, _args, output):
        """Projector forward hook (methods reducing the projected features): `(images, N, H)` -> `(images, K, H)`."""
        baseline = self.baseline
        if not baseline.enabled:
            return output
        geometry = baseline.geometry
        if output.shape[1] != geometry.num_visual_tokens:
            raise ValueError(
                f"{baseline.method}: the projector returned {output.shape[1]} tokens per image, expected the "
                f"{geometry.num_visual_tokens} of the patch grid"
            )
        return baseline.implementation.reduce_projected(output, baseline.config, geometry)

    def _baseline_reduce_projector_input(self, _module, args):
        """Projector forward pre-hook (methods reducing the vision features, with what their hooks recorded during
        this encoding): its input `(images, N, C)` -> `(images, K, C)`."""
        baseline = self.baseline
        if not baseline.enabled:
            return None
        recorded = dict(baseline.recorded)
        baseline.recorded.clear()  # the hooks hold this dict
        return (baseline.implementation.reduce_projector_input(self, args[0], recorded), *args[1:])

    # ------------------------------------------------------------------------------------------ adapter
    _baseline_visual_argument_names = ("pixel_values", "mm_encoder_outputs")

    def _baseline_encode(self, visual_inputs: dict, input_ids, attention_mask, position_ids) -> EncodedPrompt:
        """`get_image_features` (K tokens per image for the vision-side methods, whose hooks reduce them), the
        images' spans (N placeholders each) and the default positions."""
        encoded = visual_inputs["encoded_images"]
        if encoded is None:
            encoded = self.model.get_image_features(
                pixel_values=visual_inputs["pixel_values"],
                vision_feature_layer=visual_inputs["vision_feature_layer"],
                vision_feature_select_strategy=visual_inputs["vision_feature_select_strategy"],
                image_sizes=visual_inputs["image_sizes"],
                return_dict=True,
            )
        features = list(encoded.pooler_output)  # per image (n_i, H): K for vision-stage methods, else N
        geometry = self.baseline.geometry
        counts = [geometry.num_visual_tokens] * len(features)  # N placeholders each, whatever the method keeps
        spans = find_image_spans(self._visual_token_mask(input_ids), counts)
        batch_size, length = input_ids.shape
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, batch_size, length, input_ids.device)
        position_ids = position_ids.expand(batch_size, length)
        return EncodedPrompt(
            features=features, sources=None, grids=[geometry.grid] * len(features), spans=spans,
            position_ids=position_ids, encoder_outputs=encoded,
        )  # fmt: skip

    def _baseline_output(self, loss, logits, cache, encoder_outputs) -> LlavaCausalLMOutputWithPast:
        return LlavaCausalLMOutputWithPast(loss=loss, logits=logits, cache=cache, image_outputs=encoder_outputs)
