"""The batch format: the one contract between `evejax.data` (producer) and `evejax.models` (consumer).

Images travel as patch sequences, not pixel tensors, so every array has a static shape whatever the
image sizes. One visual token covers a `merge x merge` group of `patch x patch` pixel patches; with
B rows, L positions, P patch-group slots per row, S = merge**2 and F = patch**2 * 3:

| key            | shape        | dtype   | meaning                                                       |
| -------------- | ------------ | ------- | ------------------------------------------------------------- |
| `tokens`       | (B, L)       | int32   | text token ids (0 at visual positions and padding)            |
| `token_kind`   | (B, L)       | int32   | TEXT, PATCH, CLASS or SPLIT (see below)                       |
| `patch_index`  | (B, L)       | int32   | row-local index into `patches` where kind == PATCH, else 0    |
| `positions`    | (B, L)       | int32   | RoPE positions, restarting at 0 for every example             |
| `segment_ids`  | (B, L)       | int32   | example number within the row (1, 2, ...); 0 is padding       |
| `targets`      | (B, L)       | int32   | the next token's id (what position t predicts)                |
| `loss_weights` | (B, L)       | float32 | 1 where the target is a supervised caption/answer token       |
| `patches`      | (B, P, S, F) | uint8   | raw RGB pixels of each patch group, (y, x, channel) flattened |

EVEv1 (`model.vision_tokenizer='v1'`, evejax/models/vision_v1.py) adds a 4th pixel channel to
`patches` (F = patch**2 * 4), the valid-pixel mask: 255 on image pixels, 0 on the padding that rounds
a side up to a multiple of the visual token. Its global attention and PAL also need to know which
patch groups form one image, and PAL's online teacher where each group sits (V1_KEYS):

| key                | shape     | dtype   | meaning                                                       |
| ------------------ | --------- | ------- | ------------------------------------------------------------- |
| `patch_image`      | (B, P)    | int32   | row-local image number (1, 2, ... in order); 0 = empty slot   |
| `patch_coords`     | (B, P, 2) | int32   | (row, col) of the group in its image's visual-token grid      |
| `teacher_features` | (B, P, c) | float32 | optional: precomputed teacher features per group (offline PAL) |
"""
TEXT, PATCH, CLASS, SPLIT = 0, 1, 2, 3
IGNORE_INDEX = -100  # Reference label value excluded from the loss.
IMAGE_TOKEN_INDEX = -200  # Reference placeholder id where an image's visual tokens go.
IMAGE_PLACEHOLDER = '<image>'

KEYS = ('tokens', 'token_kind', 'patch_index', 'positions', 'segment_ids', 'targets',
        'loss_weights', 'patches')
V1_KEYS = ('patch_image', 'patch_coords')
