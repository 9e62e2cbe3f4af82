/* The notebook widget's adaptor (anywidget): app.js is prepended to this file to make the widget's module.
   Token selections go to the kernel as messages; the kernel attributes them and answers with an update. */
export default {
  render({ model, el }) {
    var pending = {}, next = 0;
    function request(msg) {
      return new Promise(function (resolve, reject) {
        msg.request = ++next;
        pending[msg.request] = { resolve: resolve, reject: reject };
        model.send(msg);
      });
    }
    function onMessage(msg) {
      var p = msg && pending[msg.request];
      if (!p) return;
      delete pending[msg.request];
      if (msg.type === "error") p.reject(new Error(msg.message)); else p.resolve(msg.update || {});
    }
    model.on("msg:custom", onMessage);
    var view = SourcetraceView.mount(el, model.get("data"), {
      select: function (id, selection) { return request({ type: "select", query: id, selection: selection }); },
      compare: function (id, text) { return request({ type: "compare", query: id, text: text }); }
    });
    function onData() { view.update(model.get("data")); }
    model.on("change:data", onData);
    return function () { model.off("msg:custom", onMessage); model.off("change:data", onData); };
  }
};
