// Shows a SELMA node's text output on the node (a merge's summary, the file SELMA Save LoRA wrote), as
// ComfyUI's Preview Any shows its input. The widget is added when the node first runs, and it is neither
// saved with the workflow nor sent with the prompt.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const SHOWN = "selma_output";

app.registerExtension({
  name: "selma.NodeOutputText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.category !== "SELMA") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (!message?.text?.length) return;
      let widget = this.widgets?.find((w) => w.name === SHOWN);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, SHOWN, ["STRING", { multiline: true }], app).widget;
        widget.element.readOnly = true;
        widget.serialize = false; // not in the saved workflow
        widget.options.serialize = false; // not in the prompt
      }
      widget.value = message.text.join("\n");
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
