// sd-webui-perfusion: hover hints for the Perfusion accordion. The WebUI shows the entries of its global
// `titles` map as tooltips on elements whose text matches a key; nothing else is needed by the cards.
onUiLoaded(function perfusionAddHints() {
    if (typeof titles === "undefined") {
        return;
    }
    Object.assign(titles, {
        "Apply <perfusion:...> tags": "Off: prompt tags <perfusion:NAME> are ignored and the base model is used.",
        "Key locking": "local: the concept's keys are locked to its superclass word (recommended). " +
            "global: every key sees the superclass-substituted prompt (try beta 0.4-0.6).",
        "Several concepts": "How concepts in one prompt share the rank-1 edit: approximate (fast) or exact projection.",
        "Gate bias beta": "Used when a tag gives none. Higher: weaker concept, closer to the rest of the prompt; " +
            "lower: stronger likeness.",
        "Gate temperature tau": "Used when a tag gives none (<perfusion:NAME:TAU>). Higher: softer gate."
    });
});

// The training tab's Train button: a task id for the WebUI's progress API, live previews and loss text.
function perfusion_start_training() {
    gradioApp().querySelector('#perfusion_train_error').innerHTML = '';
    var id = randomId();
    requestProgress(id, gradioApp().getElementById('perfusion_train_output'),
        gradioApp().getElementById('perfusion_train_output'), function() {}, function(progress) {
            gradioApp().getElementById('perfusion_train_progress').innerHTML = progress.textinfo;
        });
    var args = Array.from(arguments);
    args[0] = id;
    return args;
}
